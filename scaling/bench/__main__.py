from scaling.bench.runner import main

main()
