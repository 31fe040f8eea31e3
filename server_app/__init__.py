"""The ServerApp: experiment -> model, data, strategy -> rounds -> results on disk."""
