from alignloop.cli import run

run()
