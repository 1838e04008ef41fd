"""The versioned wire contract between the control plane and its agents.

Three modules: ``wire`` (every MQTT topic and message schema, each message carrying its
schema version), ``manifest`` (chunk maths and file manifests) and ``signing`` (what is
signed, and how). This package is the only agent code the plane imports, and it imports
nothing else of the agent, nor anything heavier than msgspec and cryptography: `make lint`
checks both (.importlinter). docs/protocol.md is its prose form.
"""
