from ssah.cli import main

main()
