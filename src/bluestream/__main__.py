from bluestream.cli import main

main()
