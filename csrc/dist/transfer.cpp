// Moving a whole adapter between ranks (rank-local adapter parallelism): its tensors (weights,
// pending gradients, optimizer moments, data position, RNG state) are packed into ONE flat byte
// buffer and sent as one message through a torch process group (NCCL for CUDA tensors, gloo for
// CPU ones). A 3-number header goes first, so a receiver whose tensors do not match what was sent
// gets an error naming both layouts instead of a hang or silently corrupted weights.
#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/library.h>

#include <string>
#include <vector>

namespace alto {
namespace {

void check_same_device(at::TensorList tensors, const char* arg) {
  TORCH_CHECK_VALUE(!tensors.empty(), arg, ": needs at least one tensor");
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK_VALUE(tensors[i].device() == tensors[0].device(), arg, "[", i, "] is on ",
                      tensors[i].device(), " but ", arg, "[0] is on ", tensors[0].device(),
                      ": one flat buffer needs one device");
  }
}

int64_t byte_size(const at::Tensor& t) { return t.numel() * static_cast<int64_t>(t.element_size()); }

// {total bytes, tensor count, a hash of every tensor's dtype and shape}: what both sides must agree on.
at::Tensor layout_header(at::TensorList tensors) {
  int64_t bytes = 0;
  uint64_t hash = 1469598103934665603ull;  // FNV-1a over (dtype, sizes...) of each tensor
  auto mix = [&hash](int64_t v) { hash = (hash ^ static_cast<uint64_t>(v)) * 1099511628211ull; };
  for (const auto& t : tensors) {
    bytes += byte_size(t);
    mix(static_cast<int64_t>(t.scalar_type()));
    mix(t.dim());
    for (int64_t s : t.sizes()) mix(s);
  }
  // The hash is stored as int64 bits; only equality matters.
  return at::tensor({bytes, static_cast<int64_t>(tensors.size()), static_cast<int64_t>(hash)},
                    at::TensorOptions().dtype(at::kLong))
      .to(tensors[0].device());
}

// The process group, after checking that `peer` is another of its ranks.
c10::intrusive_ptr<c10d::ProcessGroup> peer_group(const std::string& group_name, int64_t peer, const char* arg) {
  auto group = c10d::resolve_process_group(group_name);
  TORCH_CHECK_VALUE(peer >= 0 && peer < group->getSize() && peer != group->getRank(), arg, "=", peer,
                    " is not another rank of process group ", group_name, " (size ", group->getSize(),
                    ", this rank ", group->getRank(), ")");
  return group;
}

}  // namespace

at::Tensor pack_tensors(at::TensorList tensors) {
  check_same_device(tensors, "tensors");
  std::vector<at::Tensor> bytes;
  bytes.reserve(tensors.size());
  for (const auto& t : tensors) bytes.push_back(t.contiguous().view({-1}).view(at::kByte));
  return at::cat(bytes);
}

void unpack_tensors(const at::Tensor& flat, at::TensorList outs) {
  check_same_device(outs, "outs");
  TORCH_CHECK_VALUE(flat.scalar_type() == at::kByte && flat.dim() == 1, "flat: expected a 1-D uint8 tensor, got ",
                    flat.scalar_type(), " with shape ", flat.sizes());
  TORCH_CHECK_VALUE(flat.device() == outs[0].device(), "flat is on ", flat.device(), " but outs on ",
                    outs[0].device());
  int64_t total = 0;
  for (const auto& t : outs) total += byte_size(t);
  TORCH_CHECK_VALUE(total == flat.numel(), "flat: holds ", flat.numel(), " bytes but outs need ", total);
  int64_t offset = 0;
  for (size_t i = 0; i < outs.size(); ++i) {
    at::Tensor out = outs[i];
    const int64_t n = byte_size(out);
    TORCH_CHECK_VALUE(out.is_contiguous(), "outs[", i, "] must be contiguous (it is written in place)");
    out.view({-1}).view(at::kByte).copy_(flat.narrow(0, offset, n));
    offset += n;
  }
}

void send_tensors(at::TensorList tensors, std::string group_name, int64_t dst, int64_t tag) {
  check_same_device(tensors, "tensors");
  auto group = peer_group(group_name, dst, "dst");
  std::vector<at::Tensor> header{layout_header(tensors)};
  group->send(header, static_cast<int>(dst), static_cast<int>(tag))->wait();
  std::vector<at::Tensor> payload{pack_tensors(tensors)};
  group->send(payload, static_cast<int>(dst), static_cast<int>(tag))->wait();
}

void recv_tensors(at::TensorList outs, std::string group_name, int64_t src, int64_t tag) {
  check_same_device(outs, "outs");
  auto group = peer_group(group_name, src, "src");
  const at::Tensor expected = layout_header(outs);
  std::vector<at::Tensor> header{at::empty_like(expected)};
  group->recv(header, static_cast<int>(src), static_cast<int>(tag))->wait();
  const auto got = header[0].cpu(), want = expected.cpu();
  const int64_t* g = got.data_ptr<int64_t>();
  const int64_t* w = want.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(g[0] == w[0] && g[1] == w[1] && g[2] == w[2], "recv_tensors: rank ", src, " sent ", g[1],
                    " tensors of ", g[0], " bytes (layout hash ", g[2], ") but outs are ", w[1], " tensors of ",
                    w[0], " bytes (layout hash ", w[2], "): the adapter's config differs between the ranks");
  std::vector<at::Tensor> payload{at::empty({w[0]}, outs[0].options().dtype(at::kByte))};
  group->recv(payload, static_cast<int>(src), static_cast<int>(tag))->wait();
  unpack_tensors(payload[0], outs);
}

TORCH_LIBRARY_IMPL(alto, CompositeExplicitAutograd, m) {
  m.impl("pack_tensors", pack_tensors);
  m.impl("unpack_tensors", unpack_tensors);
  m.impl("send_tensors", send_tensors);
  m.impl("recv_tensors", recv_tensors);
}

}  // namespace alto
