"""This node: endpoints as network namespaces with veths and routes (``netns``,
``endpoints``) and the state directory that remembers them (``store``)."""
