"""What the gateway and the workers share about jobs: the Redis store and queue, key names, artifacts."""
