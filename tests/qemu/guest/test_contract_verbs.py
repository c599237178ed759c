"""The backend contract suite, run unchanged against the `verbs` backend on two Soft-RoCE ports."""

from contract.contract_suite import *  # noqa: F403  (backend_pair and contract_fabric come from conftest.py)
