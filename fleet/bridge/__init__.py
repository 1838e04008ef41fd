"""The MQTT bridge: transport (paho and threads), ingest (the database side) and chunks (model files).

``python manage.py run_bridge`` runs it; docs/architecture.md draws it.
"""
