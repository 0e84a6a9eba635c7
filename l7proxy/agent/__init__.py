"""The node agent: runs the datapath and the proxy and reconciles them with endpoints and
policies (``agent``), hands over to a successor without losing a request (``handover``), and
publishes its status (``status``)."""
