"""The data side: read and validate Parquet, flat series arrays, window index, batches."""
