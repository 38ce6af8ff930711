"""Model surgery: add channel attention to any model, safely and reversibly.

:func:`insert_se` / :func:`insert_attention` put an attention block after the
output of chosen modules of an existing model, :func:`remove_se` /
:func:`remove_attention` take them out again, and :func:`plan_se` /
:func:`plan_attention` show what an insertion would do without doing it. Modules
are chosen with selectors (:func:`resolve_selectors`): names, globs, ``"re:"``
regexes, module classes or predicates. :func:`save_attention` /
:func:`load_attention` ship only the inserted blocks for a base model, and
:func:`freeze_except_attention` / :func:`attention_parameters` train them alone.
"""

from attnblocks.surgery._adapter import attention_parameters, freeze_except_attention
from attnblocks.surgery._insert import insert_attention, insert_se
from attnblocks.surgery._persist import attention_state_dict, load_attention, save_attention
from attnblocks.surgery._plan import plan_attention, plan_se
from attnblocks.surgery._probe import ExampleInput
from attnblocks.surgery._remove import remove_attention, remove_se
from attnblocks.surgery._report import AttentionPlan, SitePlan
from attnblocks.surgery._selectors import Selector, resolve_selectors

__all__ = [
    "AttentionPlan",
    "ExampleInput",
    "Selector",
    "SitePlan",
    "attention_parameters",
    "attention_state_dict",
    "freeze_except_attention",
    "insert_attention",
    "insert_se",
    "load_attention",
    "plan_attention",
    "plan_se",
    "remove_attention",
    "remove_se",
    "resolve_selectors",
    "save_attention",
]
