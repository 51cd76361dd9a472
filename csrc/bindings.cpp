// Python bindings of the block manager: gptfast._C.BlockManager.
//
// Buffers (token ids, sequence ids, outputs) travel through the buffer protocol: numpy arrays
// directly; CPU torch tensors through Tensor.numpy() (a view sharing memory, ~0.5 us), since
// torch tensors do not export buffers themselves. On the hot path (a decode step every few ms)
// pass numpy views made once, e.g. `pinned_tensor.numpy()`.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "block_manager.h"

namespace py = pybind11;
using gptfast::BlockManager;
using gptfast::IntOut;
using gptfast::IntSpan;

namespace {

std::string type_name(py::handle obj) { return py::str(py::type::handle_of(obj).attr("__name__")); }

bool is_torch_tensor(py::handle obj) {
  const std::string module = py::str(py::type::handle_of(obj).attr("__module__"));
  return module.rfind("torch", 0) == 0 && py::hasattr(obj, "numpy");
}

// An integer buffer; holds the exporter's view (and so the exporter) until destroyed.
class Buffer {
 public:
  Buffer() = default;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& other) noexcept { *this = std::move(other); }
  Buffer& operator=(Buffer&& other) noexcept {
    release();
    view_ = other.view_;
    has_view_ = other.has_view_;
    other.has_view_ = false;
    owned_ = std::move(other.owned_);
    ptr = has_view_ ? view_.buf : owned_.data();
    size = other.size;
    is64 = other.is64;
    rows = other.rows;
    cols = other.cols;
    return *this;
  }
  ~Buffer() { release(); }

  Py_buffer view_{};
  bool has_view_ = false;
  std::vector<int64_t> owned_;  // a converted list/tuple
  void* ptr = nullptr;
  size_t size = 0;
  bool is64 = true;
  int64_t rows = 0;  // shape[0]
  int64_t cols = 1;  // shape[1] of a 2-D buffer

 private:
  void release() {
    if (has_view_) PyBuffer_Release(&view_);
    has_view_ = false;
  }
};

const char* dtype_of(const char* fmt, ssize_t itemsize) {
  if (fmt == nullptr) return "uint8";  // PEP 3118: no format means unsigned bytes
  // Byte-order prefixes: native ('@', '=') or this machine's own order only.
  const uint16_t probe = 1;
  const bool little = *reinterpret_cast<const unsigned char*>(&probe) == 1;
  if (*fmt == '@' || *fmt == '=' || (little && *fmt == '<') || (!little && *fmt == '>')) {
    ++fmt;
  } else if (*fmt == '<' || *fmt == '>' || *fmt == '!') {
    return "non-native byte order";
  }
  if (fmt[0] == '\0' || fmt[1] != '\0') return "non-integer";
  const char c = fmt[0];
  const bool integer = c == 'b' || c == 'B' || c == 'h' || c == 'H' || c == 'i' || c == 'I' ||
                       c == 'l' || c == 'L' || c == 'q' || c == 'Q' || c == 'n' || c == 'N';
  if (!integer) {
    if (c == 'e') return "float16";
    if (c == 'f') return "float32";
    if (c == 'd') return "float64";
    return c == '?' ? "bool" : "non-integer";
  }
  const bool is_unsigned = c == 'B' || c == 'H' || c == 'I' || c == 'L' || c == 'Q' || c == 'N';
  switch (itemsize) {
    case 1: return is_unsigned ? "uint8" : "int8";
    case 2: return is_unsigned ? "uint16" : "int16";
    case 4: return is_unsigned ? "uint32" : "int32";
    case 8: return is_unsigned ? "uint64" : "int64";
    default: return "integer";
  }
}

std::string shape_text(const Py_buffer& v) {
  std::string out = "(";
  for (int k = 0; k < v.ndim; ++k) out += (k ? ", " : "") + std::to_string(v.shape[k]);
  return out + (v.ndim == 1 ? ",)" : ")");
}

// Checks dtype (int32/int64, or int32 only), dimensions and C-contiguity; throws TypeError or
// ValueError naming the argument and the value seen. Lists/tuples of ints are accepted where
// `allow_sequence` (inputs only: an output must be memory the caller keeps).
Buffer get_buffer(py::handle obj, const char* name, int ndim, bool writable, bool int32_only,
                  bool allow_sequence) {
  Buffer buf;
  py::object holder = py::reinterpret_borrow<py::object>(obj);
  if (!PyObject_CheckBuffer(obj.ptr())) {
    if (is_torch_tensor(obj)) {
      holder = obj.attr("numpy")();  // shares memory; raises TypeError for CUDA tensors
    } else if (allow_sequence && ndim == 1 &&
               (py::isinstance<py::list>(obj) || py::isinstance<py::tuple>(obj))) {
      py::sequence seq = py::reinterpret_borrow<py::sequence>(obj);
      buf.owned_.reserve(seq.size());
      for (py::handle item : seq) {
        if (!PyIndex_Check(item.ptr())) {
          throw py::type_error(std::string(name) + " must hold ints, got an element of type " +
                               type_name(item));
        }
        try {
          buf.owned_.push_back(item.cast<int64_t>());
        } catch (const py::cast_error&) {
          throw py::value_error(std::string(name) + " holds " +
                                py::repr(item).cast<std::string>() +
                                ", outside the int64 range");
        }
      }
      buf.ptr = buf.owned_.data();
      buf.size = buf.owned_.size();
      buf.rows = static_cast<int64_t>(buf.size);
      return buf;
    } else {
      throw py::type_error(std::string(name) + " must be a " + std::to_string(ndim) +
                           "-D integer buffer (numpy array or CPU torch tensor)" +
                           (allow_sequence && ndim == 1 ? " or a list of ints" : "") + ", got " +
                           type_name(obj));
    }
  }
  const int flags = PyBUF_FORMAT | PyBUF_STRIDES | (writable ? PyBUF_WRITABLE : 0);
  if (PyObject_GetBuffer(holder.ptr(), &buf.view_, flags) != 0) {
    // e.g. a read-only array asked for writing: re-raise as ValueError with the argument name.
    py::error_already_set err;
    throw py::value_error(std::string(name) + ": " + err.what());
  }
  buf.has_view_ = true;
  const Py_buffer& v = buf.view_;
  const std::string dtype = dtype_of(v.format, v.itemsize);
  const bool ok = int32_only ? dtype == "int32" : (dtype == "int32" || dtype == "int64");
  if (!ok) {
    throw py::type_error(std::string(name) + " must have dtype " +
                         (int32_only ? "int32" : "int32 or int64") + ", got " + dtype +
                         " (format '" + (v.format ? v.format : "B") + "')");
  }
  if (v.ndim != ndim) {
    throw py::value_error(std::string(name) + " must be " + std::to_string(ndim) +
                          "-D, got " + std::to_string(v.ndim) + "-D with shape " + shape_text(v));
  }
  // C-contiguous: strides (bytes) must be those of a dense row-major array.
  ssize_t expect = v.itemsize;
  for (int k = v.ndim - 1; k >= 0; --k) {
    if (v.shape[k] > 1 && v.strides[k] != expect) {
      std::string strides;
      for (int j = 0; j < v.ndim; ++j) strides += (j ? ", " : "") + std::to_string(v.strides[j]);
      throw py::value_error(std::string(name) + " must be C-contiguous, got strides (bytes) (" +
                            strides + ") for shape " + shape_text(v));
    }
    expect *= v.shape[k];
  }
  buf.ptr = v.buf;
  buf.is64 = v.itemsize == 8;
  buf.size = static_cast<size_t>(v.len / v.itemsize);
  buf.rows = v.shape[0];
  buf.cols = ndim == 2 ? v.shape[1] : 1;
  return buf;
}

IntSpan span_of(const Buffer& b) { return IntSpan{b.ptr, b.size, b.is64}; }
IntOut out_of(const Buffer& b) { return IntOut{b.ptr, b.size, b.is64}; }

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "gptfast C++ extension: the paged KV-cache block manager.";

  // Python sees an unknown sequence id as KeyError (like a dict lookup).
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const gptfast::SequenceNotFound& e) {
      PyErr_SetString(PyExc_KeyError, e.what());
    }
  });

  m.def(
      "block_hash",
      [](uint64_t parent, py::handle tokens) {
        Buffer t = get_buffer(tokens, "tokens", 1, false, false, true);
        std::vector<int64_t> toks(t.size);
        const IntSpan span = span_of(t);
        for (size_t i = 0; i < t.size; ++i) toks[i] = span[i];
        return gptfast::block_hash(parent, toks.data(), toks.size());
      },
      py::arg("parent"), py::arg("tokens"),
      "The chained prefix-cache hash of one block of tokens given its parent's hash (tests).");
  m.attr("ROOT_HASH") = py::int_(gptfast::kRootHash);
  m.attr("MIN_BLOCK_SIZE") = gptfast::kMinBlockSize;
  m.attr("MAX_BLOCK_SIZE") = gptfast::kMaxBlockSize;

  py::class_<BlockManager>(m, "BlockManager", R"doc(
Paged KV-cache block manager with prefix caching and copy-on-write.

Parameters
----------
num_blocks : int
    Blocks in the pool, counting the null block 0 (usable blocks: num_blocks - 1).
block_size : int
    Token slots per block, 1..1024.
enable_prefix_caching : bool
    Reuse the K/V of identical full prompt blocks across sequences.

Buffers are 1-D/2-D C-contiguous int32 or int64 numpy arrays or CPU torch tensors (block_tables:
int32 only). Slot ids are ``block_id * block_size + offset``.

Examples
--------
>>> bm = BlockManager(num_blocks=64, block_size=16)
>>> bm.allocate_prompt(0, np.arange(40))          # 0 tokens cached
0
>>> slots = np.empty(40, np.int32); bm.slot_mapping(0, 0, 40, slots)
)doc")
      .def(py::init<int64_t, int64_t, bool>(), py::arg("num_blocks"), py::arg("block_size") = 16,
           py::arg("enable_prefix_caching") = true)
      .def_property_readonly("block_size", &BlockManager::block_size)
      .def_property_readonly("num_blocks", &BlockManager::num_blocks,
                             "Blocks in the pool, counting the null block 0.")
      .def_property_readonly("total_blocks", &BlockManager::total_blocks,
                             "Usable blocks (num_blocks - 1).")
      .def_property_readonly("enable_prefix_caching", &BlockManager::enable_prefix_caching)
      .def_property_readonly("prefix_hit_tokens", &BlockManager::prefix_hit_tokens,
                             "Cumulative prompt tokens served from the prefix cache.")
      .def("num_free_blocks", &BlockManager::num_free_blocks,
           "Free blocks, counting cached blocks that no sequence uses.")
      .def("num_cached_blocks", &BlockManager::num_cached_blocks,
           "Blocks whose hash is registered (used or free).")
      .def("num_sequences", &BlockManager::num_sequences)
      .def("has_sequence", &BlockManager::has_sequence, py::arg("seq_id"))
      .def("num_tokens", &BlockManager::num_tokens, py::arg("seq_id"))
      .def("blocks_of", &BlockManager::blocks_of, py::arg("seq_id"),
           "The sequence's block table as a list (tests, debugging).")
      .def("tokens_of", &BlockManager::tokens_of, py::arg("seq_id"),
           "The sequence's token ids as a list (tests, debugging, recompute after preemption).")
      .def("free_list", &BlockManager::free_list,
           "The free list from head (handed out next) to tail (tests, debugging).")
      .def(
          "next_free_blocks",
          [](const BlockManager& self, py::handle out) {
            Buffer o = get_buffer(out, "out", 1, true, false, false);
            return self.next_free_blocks(out_of(o));
          },
          py::arg("out"), R"doc(
Write the blocks the next allocations take, in order (the head of the free list), into
out[:n] (int32/int64) and return n = min(len(out), free blocks). A decode step launched before
its input token is known names its new block this way; the append that follows takes it.)doc")
      .def(
          "allocate_prompt",
          [](BlockManager& self, int64_t seq_id, py::handle tokens) {
            Buffer t = get_buffer(tokens, "tokens", 1, false, false, true);
            return self.allocate_prompt(seq_id, span_of(t));
          },
          py::arg("seq_id"), py::arg("tokens"), R"doc(
Register a new sequence with prompt ``tokens`` (1-D int32/int64 buffer or list of ints).

Takes the longest cached prefix of full blocks (never the whole prompt: at least the last token
is left to compute) and allocates blocks for the rest. Returns the number of leading tokens whose
K/V are cached (a multiple of block_size), or -1, changing nothing, when the free blocks do not
suffice. Raises ValueError for an existing seq_id, an empty prompt, or a prompt longer than the
whole pool.)doc")
      .def(
          "slot_mapping",
          [](const BlockManager& self, int64_t seq_id, int64_t start, int64_t end,
             py::handle out) {
            Buffer o = get_buffer(out, "out", 1, true, false, false);
            self.slot_mapping(seq_id, start, end, out_of(o));
          },
          py::arg("seq_id"), py::arg("start"), py::arg("end"), py::arg("out"),
          "Write the slot ids of positions [start, end) into out[:end - start] (int32/int64).")
      .def(
          "blocks_needed_for_append",
          [](BlockManager& self, py::handle seq_ids) {
            Buffer s = get_buffer(seq_ids, "seq_ids", 1, false, false, true);
            return self.blocks_needed_for_append(span_of(s));
          },
          py::arg("seq_ids"), "Free blocks that append_tokens(seq_ids, ...) would take.")
      .def(
          "append_tokens",
          [](BlockManager& self, py::handle seq_ids, py::handle tokens, py::handle slots_out,
             py::handle cow_out) {
            Buffer s = get_buffer(seq_ids, "seq_ids", 1, false, false, true);
            Buffer t = get_buffer(tokens, "tokens", 1, false, false, true);
            Buffer so = get_buffer(slots_out, "slots_out", 1, true, false, false);
            Buffer co = get_buffer(cow_out, "cow_out", 2, true, false, false);
            if (co.cols != 2) {
              throw py::value_error("cow_out must have shape [B, 2], got [" +
                                    std::to_string(co.rows) + ", " + std::to_string(co.cols) +
                                    "]");
            }
            return self.append_tokens(span_of(s), span_of(t), out_of(so), out_of(co));
          },
          py::arg("seq_ids"), py::arg("tokens"), py::arg("slots_out"), py::arg("cow_out"),
          R"doc(
Decode step: append tokens[i] to sequence seq_ids[i] for every i.

Writes each new token's slot id into slots_out[i]. When a token would go into a shared last
block (ref_cnt > 1), the sequence gets a fresh block instead and (src, dst) is written to
cow_out[k]; the caller copies K/V of block src to block dst in every layer before writing the new
tokens. Returns k, the number of copies, or -1, changing nothing, when the free blocks do not
suffice. Appends run in batch order. Raises KeyError for an unknown id, ValueError for a
duplicate id or mismatched lengths.)doc")
      .def("fork", &BlockManager::fork, py::arg("parent_id"), py::arg("child_id"),
           "The child shares every block and token of the parent (copy-on-write on append).")
      .def("free", &BlockManager::free, py::arg("seq_id"),
           "Release the sequence's blocks, last block first. KeyError if unknown.")
      .def(
          "block_tables",
          [](BlockManager& self, py::handle seq_ids, py::handle out) {
            Buffer s = get_buffer(seq_ids, "seq_ids", 1, false, false, true);
            Buffer o = get_buffer(out, "out", 2, true, true, false);
            if (o.rows < static_cast<int64_t>(s.size)) {
              throw py::value_error("out has " + std::to_string(o.rows) +
                                    " rows, the batch has " + std::to_string(s.size) +
                                    " sequences");
            }
            self.block_tables(span_of(s), static_cast<int32_t*>(o.ptr), o.cols, o.cols);
          },
          py::arg("seq_ids"), py::arg("out"), R"doc(
Write each sequence's block table as row i of ``out`` (int32 [B', max_blocks], C-contiguous,
B' >= B), padded with the null block 0. Rows past B are left as they are. ValueError if a table
has more than max_blocks blocks.)doc")
      .def("reset_prefix_cache", &BlockManager::reset_prefix_cache,
           "Drop every cached hash (used and free blocks).")
      .def("check_invariants", &BlockManager::check_invariants,
           "Raise RuntimeError describing the first violated invariant.");
}
