"""Judging a comparison: the tolerances' ranges, the default one, and the verdict line.

A comparison without any tolerance used to print PASS for any loss. Now, with labels, accuracy may drop by
at most DEFAULT_MAX_ACCURACY_DROP points unless the caller says otherwise; without labels or a tolerance
nothing is judged and the verdict says so (NaN or Inf in an output fails either way).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from onnx_fwlr.errors import FwlrError

DEFAULT_MAX_ACCURACY_DROP = 1.0  # percentage points of label accuracy (docs/defaults.md)


@dataclass
class Verdict:
    failures: list[str] = field(default_factory=list)
    note: str | None = None  # how it was judged, when the caller gave no tolerance

    @property
    def passed(self) -> bool:
        return not self.failures

    def line(self) -> str:
        if self.failures:
            return "FAIL: " + " ".join(self.failures) + (f" ({self.note})" if self.note else "")
        if self.note and self.note.startswith("no tolerance"):
            return self.note
        return "PASS" + (f" ({self.note})" if self.note else "")


def check_tolerances(min_cosine=None, max_rel_error=None, max_accuracy_drop=None) -> None:
    """Each tolerance in its range and unit, before any work: accuracy drop in percentage points."""
    if min_cosine is not None and not -1 <= min_cosine <= 1:
        raise FwlrError(f"`min_cosine` {min_cosine:g} is out of range; a cosine similarity lies between -1 and 1.")
    if max_rel_error is not None and not max_rel_error >= 0:
        raise FwlrError(f"`max_rel_error` {max_rel_error:g} is out of range; give a relative error of 0 or more.")
    if max_accuracy_drop is not None and not 0 <= max_accuracy_drop <= 100:
        raise FwlrError(f"`max_accuracy_drop` {max_accuracy_drop:g} is out of range; give percentage points "
                        "between 0 and 100 (1 = one point of accuracy).")


def judge(validation, min_cosine=None, max_rel_error=None, max_accuracy_drop=None) -> Verdict:
    """The failed tolerances, with the default accuracy tolerance when labels exist and none was given."""
    check_tolerances(min_cosine, max_rel_error, max_accuracy_drop)
    note = None
    if min_cosine is None and max_rel_error is None and max_accuracy_drop is None:
        if validation.accuracy_drop is not None:
            max_accuracy_drop = DEFAULT_MAX_ACCURACY_DROP
            note = (f"default tolerance: accuracy may drop by {DEFAULT_MAX_ACCURACY_DROP:g} point; "
                    "set `max_accuracy_drop`")
        else:
            note = ("no tolerance given: nothing judged but NaN/Inf; pass `min_cosine` or `max_rel_error` "
                    "for a verdict")
    failures = validation.check(min_cosine=min_cosine, max_rel_error=max_rel_error,
                                max_accuracy_drop=max_accuracy_drop)
    return Verdict(failures, note)
