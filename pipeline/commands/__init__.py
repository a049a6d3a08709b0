"""The user's commands (`python -m pipeline <command>`): one module each, the only code besides the
stages that parses argv, sets up logging and picks an exit status."""
