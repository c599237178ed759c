"""`xdpoib exporter`: serve every attachment's metrics to Prometheus (one exporter per host)."""

from __future__ import annotations

NAME = "exporter"
HELP = "serve Prometheus metrics of every attachment on this host"
ROOT = "the control sockets and pinned maps it reads are root-only"
EPILOG = """examples:
  xdpoib exporter                         serve http://127.0.0.1:9645/metrics
  xdpoib exporter --listen 0.0.0.0:9645   reachable from the Prometheus server
  xdpoib exporter --once                  print one scrape and exit
"""


def configure(p):
    """Add the exporter's options."""
    p.add_argument("--listen", metavar="ADDR:PORT", default="127.0.0.1:9645",
                   help="where to serve /metrics (default 127.0.0.1:9645; [::1]:9645 for IPv6)")
    p.add_argument("--once", action="store_true", help="print the exposition text once and exit")


def run(args) -> int:
    """Print one scrape (--once), or serve /metrics until stopped."""
    from xdpoib import exporter

    exporter.parse_listen(args.listen)
    if args.once:
        print(exporter.exposition(), end="")
        return 0
    server, thread = exporter.serve(args.listen)
    print(f"xdpoib exporter: serving http://{args.listen}/metrics", flush=True)
    try:
        thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    return 0
