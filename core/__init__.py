"""What every app shares, at the bottom of the layers (every app may import it; it imports none).

- `rules`: the Django-free rules the wire and the apps share (meterNo, idempotency keys, MQTT
  URLs, number limits); the codec, the simulator, models, serializers and settings import it;
- `errors`: the errors services raise, which views and the API turn into one error format;
- `api`: the REST API's shared pieces (the Idempotency-Key header, field types, the error shape);
- `admin`: admin mixins for rows that are history.
"""
