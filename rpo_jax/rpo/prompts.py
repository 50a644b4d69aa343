"""The paper's prompts for RPO's preference data (Miao et al. 2024, appendix).

RPO samples negatives for 8 novel training prompts; which 8 depends on whether the subject is an
object or a live subject (an animal). ``{identifier}`` is the rare token ("[V]") and ``{cls}`` the
class noun. References are scored against :data:`REFERENCE_PROMPT`.
"""
from __future__ import annotations

OBJECT_PROMPTS = (
    "a {identifier} {cls} in Vincent Van Gogh rendition",
    "a {identifier} {cls} on the Moon",
    "a green {identifier} {cls}",
    "a {identifier} {cls} with a China Great Wall in the background",
    "a {identifier} {cls} on top of wooden roof",
    "a {identifier} {cls} with the Statue of Liberty in the background",
    "a {identifier} {cls} with a volcano in the background",
    "a {identifier} {cls} on a subway platform",
)
LIVE_PROMPTS = (
    "a {identifier} {cls} wearing a green outfit",
    "a {identifier} {cls} in Vincent Van Gogh rendition",
    "a {identifier} {cls} with a China Great Wall in the background",
    "a {identifier} {cls} is swimming in a pool",
    "a {identifier} {cls} on a subway platform",
    "a {identifier} {cls} with the Statue of Liberty in the background",
    "a {identifier} {cls} on the Moon",
    "a green {identifier} {cls}",
)
REFERENCE_PROMPT = "a photo of {identifier} {cls}"
