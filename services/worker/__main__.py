"""`python -m services.worker` = `chorus worker` with the defaults."""

from services.cli.jobs import worker_command

worker_command()
