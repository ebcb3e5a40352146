"""toktra-agent: sees which programs on a Linux host talk to LLM providers.

Connection metadata flows kernel -> collector -> classifier -> shipper; no
payload byte is ever read.
"""

__version__ = "0.1.0"
