from scaling.train.loop import main

main()
