from loupe.cli.main import main

__all__ = ["main"]
