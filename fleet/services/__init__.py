"""Every state change of the fleet is one function here.

Each runs in a transaction, writes its audit record, and sends MQTT publishes or
Celery jobs only once the transaction has committed.
"""
