"""Support-ticket triage: schema-constrained, grounded extraction with validation.

from lmstack.llm import make_generator
from lmstack.triage import Ticket, Triager

record = Triager(make_generator()).triage(Ticket(subject="...", body="..."))
"""

from lmstack.triage.schema import Ticket, TriageOutput, TriageRecord
from lmstack.triage.triage import TriageConfig, Triager

__all__ = ["Ticket", "TriageConfig", "TriageOutput", "TriageRecord", "Triager"]
