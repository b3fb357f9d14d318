"""python -m mxfp4_compile demo [--help]"""
import sys

from .demo import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] != "demo":
        sys.exit("usage: python -m mxfp4_compile demo [--help]")
    sys.exit(main(args[1:]))
