"""`python -m adapt.demo [--tiny] [--steps N] [--out DIR]`: the quickstart job (see adapt/quickstart.py)."""

from adapt.cli import quickstart_cmd

if __name__ == "__main__":
    import typer

    typer.run(quickstart_cmd)
