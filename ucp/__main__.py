from ucp.cli import run

run()
