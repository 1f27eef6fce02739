from scaling.data.tokens import main

main()
