"""Entry point of the `disttrain` console script: one sub-command per mode of use."""
import argparse
import sys


def build_parser():
    parser = argparse.ArgumentParser(prog="disttrain", description="disttrain: distributed deep-learning training")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="train an MLP and a small CNN on generated data (no downloads)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from disttrain.cli import demo

        return demo.main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
