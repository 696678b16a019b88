"""The fleet simulation (`python -m benchmarks.fleet`): N agents and fake modems against one
mosquitto through a broker restart. rig: the processes; scenario: the steps and the figures;
measure: the readings; model: what the backoff predicts; plot: the PNG."""
