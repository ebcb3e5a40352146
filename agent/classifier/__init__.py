"""The classifier stage: `connection` messages in, `event` messages out.

It decides which connections went to an LLM provider, from the SNI alone,
and passes on only those; the rest are counted by the reason they did not
match and go no further. Runs unprivileged.
"""
