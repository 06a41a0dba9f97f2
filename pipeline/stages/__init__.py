"""What the flows call: the batch a flow runs in, the steps (prepare, train, backtest,
promote, report), the forecast steps and the tune step."""
