"""A reference ingest and enrollment service, for development and tests.

In: enrollment requests (a CSR for a device's Ed25519 key plus an enrollment
token, or the device's current certificate for renewal) and gzip batches of
connection events over mutual TLS, as the shipper sends them.
Out: device certificates signed by a local development CA, and the accepted
events appended to a JSONL file, one per line, tagged with the device id taken
from the client certificate.

`ca` keeps the CA and issues certificates, `server` answers HTTPS, `cli` runs
the service from the command line. Nothing here is meant for production: the
CA key sits unencrypted next to the data it protects.
"""
