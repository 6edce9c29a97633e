"""The reward model's client: RationalRewards templates, the OpenAI-protocol HTTP client and
the parser. Here, not in workers/, because the gateway uses it too (POST /critique), and the
gateway never imports the worker's code."""
