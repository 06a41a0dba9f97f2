"""What a run writes and prints: partitions, plots, the HTML page, the console lines."""
