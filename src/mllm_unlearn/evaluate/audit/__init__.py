"""The audit: is the forgetting real? Probes beyond accuracy on the photos used for unlearning.

One module per probe, each stating its protocol: :mod:`.unseen` (unseen photos), :mod:`.identity`
(strangers and misidentification), :mod:`.relearn` (relearning attack, benign fine-tuning),
:mod:`.quantization`, :mod:`.oracle` / :mod:`.forget_quality` / :mod:`.mia` (the retrained oracle,
KS forget quality, membership inference). :mod:`.card` runs them on one model and writes the report;
:mod:`mllm_unlearn.experiments.audit` runs whole audits over several worlds.
"""

from .card import AuditConfig, References, audit_model, prepare_references, report_dict, write_report
from .common import AuditData, load_audit_data, load_run
from .relearn import AttackBudget

__all__ = [
    "AttackBudget",
    "AuditConfig",
    "AuditData",
    "References",
    "audit_model",
    "load_audit_data",
    "load_run",
    "prepare_references",
    "report_dict",
    "write_report",
]
