"""`kubellm models pull | list | download`: the local model cache."""

from __future__ import annotations

from kubellm.runtime.hub import download, embedded


def models(args) -> int:
    if args.action == "pull":
        print(embedded.pull(args.name, force=args.force))
    elif args.action == "download":
        print(download.download_hf(args.name, args.dest, adapter=args.adapter))
    else:
        for name in embedded.known_names():
            print(name)
    return 0
