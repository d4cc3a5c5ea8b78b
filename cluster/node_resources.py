#!/usr/bin/env python3
"""Print this machine's dsmath role resources as JSON, for ``ray start --resources=...`` (on-prem clusters).

Usage: python node_resources.py CLUSTER_YAML [--ip IP]

Looks up ``metadata.dsmath_node_resources[<one of this machine's IPs>]`` in the cluster YAML and prints it
(``{}`` when the machine is not listed, so an unlisted node joins with no role rather than failing).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys

import yaml


def local_ips() -> set[str]:
    ips = {"127.0.0.1"}
    try:
        import psutil  # a Ray dependency: every interface's addresses

        for addrs in psutil.net_if_addrs().values():
            ips.update(a.address for a in addrs if a.family == socket.AF_INET)
    except ImportError:
        ips.update(socket.gethostbyname_ex(socket.gethostname())[2])
    return ips


def resources_for(config: dict, ips: set[str]) -> dict:
    table = (config.get("metadata") or {}).get("dsmath_node_resources") or {}
    for ip, res in table.items():
        if str(ip) in ips:
            return dict(res)
    return {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cluster_yaml")
    parser.add_argument("--ip", default=None, help="look up this IP instead of the machine's own")
    args = parser.parse_args(argv)
    with open(args.cluster_yaml, encoding="utf-8") as fh:
        config = yaml.safe_load(fh)
    ips = {args.ip} if args.ip else local_ips()
    print(json.dumps(resources_for(config, ips), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
