"""The `chorus` command line (`serving.cli.main:main`)."""
