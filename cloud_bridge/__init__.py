"""Everything between cloud and edge over MQTT: schemas, the gateway link, the operator side."""
