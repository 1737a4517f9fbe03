from bluestream.daemon.cli import main

main()
