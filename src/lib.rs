//! DeliverTrack: the wiring of sources, the dataflow, sinks and the API.
