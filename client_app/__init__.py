"""The ClientApp: handlers for the describe, train and evaluate phases."""
