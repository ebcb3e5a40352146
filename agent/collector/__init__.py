"""The collector stage: BPF records in, `connection` messages out.

The only privileged part of the agent: it loads and attaches the BPF
object, reads the ring buffer, and hands each closed connection's
metadata to the classifier.
"""
