"""Input limits: every size pmgen accepts from outside is bounded here, in one place.

Inputs over a limit are refused with an error naming the file (and line / field) and the limit;
nothing is silently cut, except user text handed to the LLM, which the verbalizer shortens to a
few hundred characters per event and the record says so (``warnings``).

=========================  ==========  ==============================================================
limit                      default     applies to
=========================  ==========  ==============================================================
``max_image_pixels``       4096×4096   item / target / history images (checked from the header,
                                       before the pixels are decoded)
``max_image_bytes``        20 MiB      the same images, on disk or uploaded
``max_data_file_bytes``    512 MiB     items / users / samples JSONL files of a dataset folder
``max_request_file_bytes`` 16 MiB      a ``--behaviors`` file and a ``--batch`` file
``max_batch_requests``     100,000     lines of a batch file
``max_events_per_user``    10,000      events of one user (a history, or a request's inline user)
``max_text_chars``         10,000      one event's ``text`` (review, search, conversation, note)
``max_title_chars``        1,000       an item's ``title``
``max_json_depth``         32          nesting of arrays and objects in a JSON request to the service
                                       (checked before the JSON is parsed)
=========================  ==========  ==============================================================

Change them for a run with ``dataclasses.replace(LIMITS, ...)`` and pass the result where a
``limits`` argument is taken.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 2**20


@dataclass(frozen=True)
class Limits:
    """Sizes pmgen accepts (see the module docstring for what each applies to). All must be > 0."""

    max_image_pixels: int = 4096 * 4096
    max_image_bytes: int = 20 * MiB
    max_data_file_bytes: int = 512 * MiB
    max_request_file_bytes: int = 16 * MiB
    max_batch_requests: int = 100_000
    max_events_per_user: int = 10_000
    max_text_chars: int = 10_000
    max_title_chars: int = 1_000
    max_json_depth: int = 32

    def __post_init__(self) -> None:
        bad = [k for k, v in vars(self).items() if not isinstance(v, int) or v <= 0]
        if bad:
            raise ValueError(f"limits must be positive integers: {', '.join(bad)}")


LIMITS = Limits()
"""The default limits (immutable)."""


def describe_bytes(n: int) -> str:
    """``1536`` → ``"1.5 KiB"``."""
    for unit, size in (("GiB", 2**30), ("MiB", MiB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def check_file_size(path: str, size: int, limit: int, what: str) -> str | None:
    """An error message when ``size`` exceeds ``limit`` (``None`` when within it)."""
    if size > limit:
        return (f"{what} {path} is {describe_bytes(size)}; the limit is {describe_bytes(limit)} "
                "(pmgen.limits.Limits)")
    return None
