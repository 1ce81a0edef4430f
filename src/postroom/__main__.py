from postroom.cli import main

main()
