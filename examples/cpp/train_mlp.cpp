// Trains a small MLP on generated data with flora::Flora (compressed momentum) and prints the
// loss going down; exits non-zero when it does not. With --checkpoint PATH, it saves the
// optimizer halfway, loads it back into a new optimizer, and trains on from there.
//
//   train_mlp [--steps N] [--device cpu|cuda] [--checkpoint PATH]
#include <flora/flora.h>
#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

namespace {

struct Net : torch::nn::Module {
  Net()
      : fc1(register_module("fc1", torch::nn::Linear(32, 128))),
        fc2(register_module("fc2", torch::nn::Linear(128, 128))),
        fc3(register_module("fc3", torch::nn::Linear(128, 1))) {}

  torch::Tensor forward(torch::Tensor x) {
    x = torch::gelu(fc1->forward(x));
    x = torch::gelu(fc2->forward(x));
    return fc3->forward(x);
  }

  torch::nn::Linear fc1, fc2, fc3;
};

// Rank-8 momentum for the 128 x 32 and 128 x 128 weights; the 1 x 128 output layer and the
// biases keep dense momentum (flora::param_layout decides, as in Python).
flora::FloraOptions options() {
  return flora::FloraOptions(1e-2).beta1(0.9).rank(8).kappa(50).seed(1);
}

}  // namespace

int main(int argc, char** argv) {
  int steps = 300;
  std::string device_name = torch::cuda::is_available() ? "cuda" : "cpu";
  std::string checkpoint;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--steps") {
      steps = std::atoi(argv[i + 1]);
    } else if (flag == "--device") {
      device_name = argv[i + 1];
    } else if (flag == "--checkpoint") {
      checkpoint = argv[i + 1];
    } else {
      std::fprintf(stderr, "usage: %s [--steps N] [--device cpu|cuda] [--checkpoint PATH]\n",
                   argv[0]);
      return 2;
    }
  }
  const torch::Device device(device_name);
  torch::manual_seed(0);

  // y = sin(x0) * x1 + 0.5 x2^2 - x3, plus a little noise
  const torch::Tensor x = torch::randn({2048, 32}).to(device);
  const torch::Tensor y = (torch::sin(x.select(1, 0)) * x.select(1, 1) +
                           0.5 * x.select(1, 2).pow(2) - x.select(1, 3))
                              .unsqueeze(1) +
                          0.05 * torch::randn({2048, 1}).to(device);

  auto net = std::make_shared<Net>();
  net->to(device);
  auto optimizer = std::make_unique<flora::Flora>(net->parameters(), options());

  double first_loss = 0.0, loss_value = 0.0;
  for (int step = 1; step <= steps; ++step) {
    optimizer->zero_grad();
    torch::Tensor loss = torch::mse_loss(net->forward(x), y);
    loss.backward();
    optimizer->step();
    loss_value = loss.item<double>();
    if (step == 1) first_loss = loss_value;
    if (step == 1 || step % 25 == 0) std::printf("step %4d  loss %.4f\n", step, loss_value);
    if (!checkpoint.empty() && step == steps / 2) {
      torch::save(*optimizer, checkpoint);
      optimizer = std::make_unique<flora::Flora>(net->parameters(), options());
      torch::load(*optimizer, checkpoint);
      std::printf("step %4d  saved the optimizer to %s and loaded it back\n", step,
                  checkpoint.c_str());
    }
  }
  int64_t state_bytes = 0;
  for (const auto& [key, state] : optimizer->state()) {
    const auto& s = static_cast<const flora::FloraParamState&>(*state);
    for (const auto& t : {s.row_second_moment(), s.col_second_moment(), s.second_moment(),
                          s.momentum()}) {
      if (t.defined()) state_bytes += t.numel() * t.element_size();
    }
  }
  int64_t params = 0;
  for (const auto& p : net->parameters()) params += p.numel();
  std::printf("loss %.4f -> %.4f on %s; optimizer state %lld bytes for %lld parameters "
              "(AdamW: %lld)\n",
              first_loss, loss_value, device_name.c_str(), static_cast<long long>(state_bytes),
              static_cast<long long>(params), static_cast<long long>(8 * params));
  if (!(loss_value < 0.5 * first_loss)) {
    std::fprintf(stderr, "the loss did not halve\n");
    return 1;
  }
  return 0;
}
