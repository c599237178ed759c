"""The ctypes mirror in xdpoib/fabric/_ibverbs.py against the real <infiniband/verbs.h>.

A C program compiled against the installed header prints sizeof, alignof and offsetof for every struct
and field the mirror declares (and the ops-table slots it calls through); each must equal ctypes' view.
Runs on the host (no device needed); the guest then exercises the same layouts on real verbs.
"""

from __future__ import annotations

import ctypes
import subprocess

import pytest
from prereq import need_cmd, need_file

from xdpoib.fabric import _ibverbs as ib

HEADER = "/usr/include/infiniband/verbs.h"

# ctypes class -> C type; fields are checked by name unless listed in SKIP (no C name: padding/anonymous).
STRUCTS = {
    ib.Gid: "union ibv_gid",
    ib.GlobalRoute: "struct ibv_global_route",
    ib.AhAttr: "struct ibv_ah_attr",
    ib.QpCap: "struct ibv_qp_cap",
    ib.QpInitAttr: "struct ibv_qp_init_attr",
    ib.QpAttr: "struct ibv_qp_attr",
    ib.Sge: "struct ibv_sge",
    ib.SendWr: "struct ibv_send_wr",
    ib.RecvWr: "struct ibv_recv_wr",
    ib.Wc: "struct ibv_wc",
    ib.AsyncEvent: "struct ibv_async_event",
}
PREFIXES = {              # structs mirrored only up to the fields we read: offsets only
    ib._ContextHead: "struct ibv_context",
    ib._QpHead: "struct ibv_qp",
    ib._MrHead: "struct ibv_mr",
    ib._CompChannel: "struct ibv_comp_channel",
}
SKIP = {(ib.Gid, "_align"), (ib.SendWr, "tail"), (ib._ContextHead, "ops")}
OPS = {"poll_cq": ib._OP_POLL_CQ, "req_notify_cq": ib._OP_REQ_NOTIFY_CQ,
       "post_send": ib._OP_POST_SEND, "post_recv": ib._OP_POST_RECV}


def _expectations() -> dict[str, tuple[str, int]]:
    """label -> (C expression, ctypes value)."""
    out: dict[str, tuple[str, int]] = {}
    for cls, ctype in STRUCTS.items():
        out[f"sizeof {ctype}"] = (f"sizeof({ctype})", ctypes.sizeof(cls))
        out[f"alignof {ctype}"] = (f"_Alignof({ctype})", ctypes.alignment(cls))
    for cls, ctype in (STRUCTS | PREFIXES).items():
        for name, *_ in cls._fields_:
            if (cls, name) not in SKIP:
                out[f"{ctype}.{name}"] = (f"offsetof({ctype}, {name})", getattr(cls, name).offset)
    ops = ib._ContextHead.ops.offset
    for name, index in OPS.items():
        out[f"ibv_context.ops.{name}"] = (f"offsetof(struct ibv_context, ops.{name})", ops + 8 * index)
    out["ud.remote_qkey"] = ("offsetof(struct ibv_send_wr, wr.ud.remote_qkey)",
                             ib.SendWr.wr.offset + ib._Ud.remote_qkey.offset)
    return out


def test_ctypes_layouts_match_verbs_h(tmp_path):
    need_file(HEADER)
    need_cmd("cc")
    expect = _expectations()
    lines = "\n".join(f'    printf("%s=%zu\\n", "{label}", (size_t)({expr}));'
                      for label, (expr, _) in expect.items())
    src = tmp_path / "abi.c"
    src.write_text(f"#include <stddef.h>\n#include <stdio.h>\n#include <infiniband/verbs.h>\n"
                   f"int main(void)\n{{\n{lines}\n    return 0;\n}}\n")
    build = subprocess.run(["cc", "-o", str(tmp_path / "abi"), str(src)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(tmp_path / "abi")], capture_output=True, text=True, check=True)
    actual = dict(line.split("=") for line in run.stdout.splitlines())
    wrong = {label: (py, int(actual[label])) for label, (_, py) in expect.items() if int(actual[label]) != py}
    assert not wrong, f"ctypes vs verbs.h (ctypes, C): {wrong}"
    assert len(actual) == len(expect) > 60


@pytest.mark.parametrize("name", ["ibv_attach_mcast", "ibv_create_qp", "ibv_get_async_event"])
def test_library_exports_what_the_mirror_calls(name):
    need_file(HEADER)
    try:
        lib = ib.lib()
    except OSError as exc:
        pytest.fail(f"libibverbs.so.1 cannot be loaded: {exc}")
    assert getattr(lib, name).argtypes is not None


# numpy views of the ctypes arrays (the columnar data path): dtype field -> the ctypes field it must overlay
NUMPY_VIEWS = {
    "WC_DTYPE": (ib.Wc, {n: (ib.Wc, n) for n in ib.WC_DTYPE.names}),
    "SGE_DTYPE": (ib.Sge, {n: (ib.Sge, n) for n in ib.SGE_DTYPE.names}),
    "RECV_WR_DTYPE": (ib.RecvWr, {n: (ib.RecvWr, n) for n in ib.RECV_WR_DTYPE.names}),
    "SEND_WR_DTYPE": (ib.SendWr, {**{n: (ib.SendWr, n) for n in ("wr_id", "next", "sg_list", "send_flags")},
                                  **{n: (ib._Ud, n) for n in ("ah", "remote_qpn", "remote_qkey")}}),
}


@pytest.mark.parametrize("name", sorted(NUMPY_VIEWS))
def test_numpy_views_overlay_the_ctypes_fields(name):
    dtype = getattr(ib, name)
    cls, fields = NUMPY_VIEWS[name]
    assert dtype.itemsize == ctypes.sizeof(cls)
    for field, (owner, cname) in fields.items():
        base = ib.SendWr.wr.offset if owner is ib._Ud else 0
        cfield = getattr(owner, cname)
        ftype, offset = dtype.fields[field][:2]
        assert (offset, ftype.itemsize) == (base + cfield.offset, cfield.size), field
