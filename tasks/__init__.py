"""Pipeline steps: plain typed functions, each doing one step, testable without an orchestrator."""
