"""Subnet Administration: the SA client over libibumad, one module per concern, re-exported here.

- `sa_records.py`: PathRecord, MCMemberRecord, ClassPortInfo, PortInfo, LocalPort with `pack`/`parse`,
  the SA and SMP MAD headers, the SA's status codes as `SAError` subclasses (pure, no I/O);
- `sa_client.py`: `SAClient` on one umad port (own port by SMPs to ourselves, PathRecords, joins,
  memberships), its transaction engine and `RetryPolicy`, the `PathCache`, the `LatencyHistogram`;
- `sa_remote.py`: `RemoteSAClient`, an SA client running as a simulated host in a child process
  (`SimFabric.sa_client(host)`), over `remote.py`'s child-process mechanism;
- here: every name of those (`from xdpoib.fabric.sa import X` keeps working) and one-shot queries for
  people: `python -m xdpoib.fabric.sa [--device DEV] [--port N] port|cpi|path DGID...|member MGID [PORTGID]|group MGID`
  (several DGIDs are asked at once, `SAClient.paths`: a list, an error entry for each refused one).
"""

from __future__ import annotations

import argparse
import json
import sys

from xdpoib.errors import XdpoibError
from xdpoib.fabric.base import gid_str
from xdpoib.fabric.sa_client import (
    LATENCY_BUCKETS,
    LatencyHistogram,
    PathCache,
    RetryPolicy,
    SAClient,
)
from xdpoib.fabric.sa_records import (
    ATTR_CLASS_PORT_INFO,
    ATTR_MCMEMBER_RECORD,
    ATTR_NODE_RECORD,
    ATTR_PATH_RECORD,
    CAP2_SEND_ONLY_FULL,
    ERROR_CLASSES,
    JOIN_FULL,
    JOIN_NON,
    JOIN_SEND_ONLY_FULL,
    JOIN_SEND_ONLY_NON,
    MAD_LEN,
    MC_CREATE_MASK,
    MC_FLOW,
    MC_HOP,
    MC_JOIN_MASK,
    MC_JOIN_STATE,
    MC_MGID,
    MC_MTU,
    MC_MTU_SEL,
    MC_PKEY,
    MC_PORT_GID,
    MC_QKEY,
    MC_RATE,
    MC_RATE_SEL,
    MC_SL,
    MC_TCLASS,
    METHOD_DELETE,
    METHOD_GET,
    METHOD_GET_TABLE,
    METHOD_RESP,
    METHOD_SET,
    MTU_BYTES,
    PORT_STATES,
    PR_DGID,
    PR_DLID,
    PR_PKEY,
    PR_SGID,
    SA_DATA_LEN,
    SA_HDR_LEN,
    SA_QKEY,
    SA_QP,
    SELECTOR_EXACTLY,
    SMP_ATTR_NODE_INFO,
    SMP_ATTR_PKEY_TABLE,
    SMP_ATTR_PORT_INFO,
    UMAD_STATUS_TIMEOUT,
    ClassPortInfo,
    LocalPort,
    MCMemberRecord,
    PathRecord,
    PortInfo,
    SABusyError,
    SADeniedError,
    SAError,
    SAInsufficientComponentsError,
    SAInvalidGIDError,
    SAMad,
    SAMadError,
    SANoRecordsError,
    SANoResourcesError,
    SARequestInvalidError,
    SATimeoutError,
    SATooManyRecordsError,
    as_dict,
    pack_sa_mad,
    pack_smp,
    parse_sa_mad,
    parse_smp,
    status_error,
    to_gid,
)
from xdpoib.fabric.sa_remote import (
    QUERIES,
    REMOTE_METHODS,
    RemoteSAClient,
    SAService,
)

__all__ = [
    "ATTR_CLASS_PORT_INFO",
    "ATTR_MCMEMBER_RECORD",
    "ATTR_NODE_RECORD",
    "ATTR_PATH_RECORD",
    "CAP2_SEND_ONLY_FULL",
    "ERROR_CLASSES",
    "JOIN_FULL",
    "JOIN_NON",
    "JOIN_SEND_ONLY_FULL",
    "JOIN_SEND_ONLY_NON",
    "LATENCY_BUCKETS",
    "MAD_LEN",
    "MC_CREATE_MASK",
    "MC_FLOW",
    "MC_HOP",
    "MC_JOIN_MASK",
    "MC_JOIN_STATE",
    "MC_MGID",
    "MC_MTU",
    "MC_MTU_SEL",
    "MC_PKEY",
    "MC_PORT_GID",
    "MC_QKEY",
    "MC_RATE",
    "MC_RATE_SEL",
    "MC_SL",
    "MC_TCLASS",
    "METHOD_DELETE",
    "METHOD_GET",
    "METHOD_GET_TABLE",
    "METHOD_RESP",
    "METHOD_SET",
    "MTU_BYTES",
    "PORT_STATES",
    "PR_DGID",
    "PR_DLID",
    "PR_PKEY",
    "PR_SGID",
    "QUERIES",
    "REMOTE_METHODS",
    "SA_DATA_LEN",
    "SA_HDR_LEN",
    "SA_QKEY",
    "SA_QP",
    "SELECTOR_EXACTLY",
    "SMP_ATTR_NODE_INFO",
    "SMP_ATTR_PKEY_TABLE",
    "SMP_ATTR_PORT_INFO",
    "UMAD_STATUS_TIMEOUT",
    "ClassPortInfo",
    "LatencyHistogram",
    "LocalPort",
    "MCMemberRecord",
    "PathCache",
    "PathRecord",
    "PortInfo",
    "RemoteSAClient",
    "RetryPolicy",
    "SABusyError",
    "SAClient",
    "SADeniedError",
    "SAError",
    "SAInsufficientComponentsError",
    "SAInvalidGIDError",
    "SAMad",
    "SAMadError",
    "SANoRecordsError",
    "SANoResourcesError",
    "SARequestInvalidError",
    "SAService",
    "SATimeoutError",
    "SATooManyRecordsError",
    "as_dict",
    "gid_str",
    "main",
    "pack_sa_mad",
    "pack_smp",
    "parse_sa_mad",
    "parse_smp",
    "status_error",
    "to_gid",
]


def main(argv: list[str] | None = None) -> int:
    """`python -m xdpoib.fabric.sa port|cpi|path DGID...|member MGID [PORTGID]|group MGID`: one query, as
    JSON; `path` with several DGIDs asks them at once and prints a list (a refused one as {"error": ...},
    and the exit status is then 1)."""
    ap = argparse.ArgumentParser(prog="python -m xdpoib.fabric.sa", description=__doc__.splitlines()[0])
    ap.add_argument("--device")
    ap.add_argument("--port", type=int)
    ap.add_argument("op", choices=("port", "cpi", "path", "member", "group"))
    ap.add_argument("args", nargs="*")
    a = ap.parse_args(argv)
    try:
        if a.op == "path" and len(a.args) > 1:
            gids = [to_gid(g) for g in a.args]          # a malformed one is refused before any query
            with SAClient.open(a.device, a.port) as c:
                got = c.paths(gids)
            print(json.dumps([{"error": str(r)} if isinstance(r, SAError) else as_dict(r) for r in got], indent=1))
            return 1 if any(isinstance(r, SAError) for r in got) else 0
        with SAClient.open(a.device, a.port) as c:
            fn = {"port": c.port, "cpi": c.class_port_info, "path": c.path, "member": c.member,
                  "group": c.group}[a.op]
            res = fn(*a.args)
            print(json.dumps(as_dict(res) if res is not None else None, indent=1))
    except XdpoibError as e:
        print(f"xdpoib: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
