"""Tensor hooks: gradient hooks on any tensor, post-accumulate hooks on leaves, retain_grad."""
import weakref


class RemovableHandle:
    def __init__(self, hooks, hook):
        self._hooks = hooks
        self._hook = hook

    def remove(self):
        if self._hook in self._hooks:
            self._hooks.remove(self._hook)


def register_tensor_hook(tensor, hook):
    if not tensor.requires_grad:
        raise RuntimeError("cannot register a hook on a tensor that does not require grad")
    if tensor._node is None:
        if tensor._hooks is None:
            tensor._hooks = []
        hooks = tensor._hooks
    else:
        node = tensor._node
        if node.out_hooks is None:
            node.out_hooks = {}
        hooks = node.out_hooks.setdefault(tensor._out_index, [])
    # retain_grad's store runs after the tensor's other hooks whatever the order they came in, as torch's:
    # .grad holds the gradient that flows on
    if hooks and getattr(hooks[-1], "retains_grad", False):
        hooks.insert(len(hooks) - 1, hook)
    else:
        hooks.append(hook)
    return RemovableHandle(hooks, hook)


def register_post_accumulate_hook(tensor, hook):
    if tensor._node is not None or not tensor.requires_grad:
        raise RuntimeError("post-accumulate-grad hooks are for leaf tensors that require grad")
    if tensor._post_hooks is None:
        tensor._post_hooks = []
    tensor._post_hooks.append(hook)
    return RemovableHandle(tensor._post_hooks, hook)


def retain_grad(tensor):
    if tensor._node is None:
        return  # leaves keep .grad anyway
    hooks = (tensor._node.out_hooks or {}).get(tensor._out_index, ())
    if any(getattr(h, "retains_grad", False) for h in hooks):
        return  # already retained: a second store hook would add the gradient twice
    ref = weakref.ref(tensor)

    def store(grad):
        t = ref()
        if t is not None:
            g = grad.detach()
            t.grad = g if t.grad is None else t.grad + g

    store.retains_grad = True
    register_tensor_hook(tensor, store)
