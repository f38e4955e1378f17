"""What the three scripts run: the header and its grid (`header`), one grid point end to end (`experiment`),
the CSV logs (`logs`), the command-line entry (`cli`), the ad hoc and retraining procedures (`adhoc`,
`retrain`, `procedures`), evaluation, the deployable outputs (`deploy`), figures and the theory check."""
