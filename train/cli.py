import click


@click.group()
def main():
    """gutout"""
