## Reference values for the glmmTMB-style report: profile and Wald confidence intervals, delta-method standard
## errors of random-effect SDs and correlations, predictions with standard errors, and the fits of the
## uncorrelated models a bambi formula writes.
##
##   DATA=examples/data Rscript reference/r/glmmtmb_report.R
##
## Reads the CSVs and factor_levels.json written by reference/r/export_data.R; writes $OUTJSON (default
## reference/report.json). Takes about 6 seconds.
##
## - cbpp, binomial, (1 | herd): confint(method = "profile") and confint(method = "wald") of every parameter,
##   on glmmTMB's internal scale (log-SD for the variance) and on the SD scale; predict(se.fit = TRUE) on the
##   link scale for four rows (a known herd in two periods, a new herd level: allow.new.levels = TRUE), with the
##   random effects (re.form = NULL) and without (re.form = NA).
## - sleepstudy, Reaction ~ Days + (Days | Subject): SDs and the correlation with delta-method SEs computed from
##   vcov(fit, full = TRUE) on glmmTMB's own parameterisation (log-SD and corr_par, cor = p / sqrt(1 + p^2)).
##   At the maximum the delta-method SE of a function is the same whatever the parameterisation, so these are
##   what any other parameterisation (an LKJ Cholesky factor) must give.
## - the models written as bambi formulas, whose group-specific terms are uncorrelated: sleepstudy
##   diag(Days | Subject) (= (1 | Subject) + (0 + Days | Subject)), cbpp, Penicillin, grouseticks (Poisson):
##   fixed effects with SEs, SDs, residual SD, logLik.
##
## Deps (Debian): apt-get install r-base-core r-cran-glmmtmb r-cran-jsonlite
suppressPackageStartupMessages({ library(glmmTMB); library(jsonlite) })

data_dir <- Sys.getenv("DATA", "examples/data")
out_json <- Sys.getenv("OUTJSON", "reference/report.json")
lev <- fromJSON(file.path(data_dir, "factor_levels.json"), simplifyVector = TRUE)
read_set <- function(name, file) {
  d <- read.csv(file.path(data_dir, file), stringsAsFactors = FALSE)
  for (col in names(lev$levels[[name]])) {
    d[[col]] <- factor(as.character(d[[col]]), levels = lev$levels[[name]][[col]])
    stopifnot(!anyNA(d[[col]]))
  }
  d
}
fixed_table <- function(fit) {
  s <- summary(fit)$coefficients$cond
  list(label = rownames(s), estimate = unname(s[, 1]), se = unname(s[, 2]))
}
sds <- function(fit) lapply(VarCorr(fit)$cond, function(v) as.list(attr(v, "stddev")))

out <- list(provenance = list(
  R = R.version.string, glmmTMB = as.character(packageVersion("glmmTMB")),
  date = format(Sys.time(), "%Y-%m-%d %H:%M:%S %Z"),
  command = "DATA=examples/data Rscript reference/r/glmmtmb_report.R"))

## cbpp: intervals and predictions
cbpp <- read_set("cbpp", "cbpp.csv")
fit <- glmmTMB(cbind(incidence, size - incidence) ~ period + (1 | herd), family = binomial, data = cbpp)
prof <- confint(fit, method = "profile", level = 0.95)
wald <- confint(fit, method = "wald", level = 0.95)
internal_prof <- confint(profile(fit), level = 0.95)  # log-SD scale for theta
newdata <- data.frame(period = factor(c("1", "3", "2", "4"), levels = levels(cbpp$period)),
                      herd = c("1", "1", "7", "new"),
                      incidence = 0, size = 1)
## the same profile intervals solved exactly: for each parameter of fit$fit$par, the Laplace objective minimised
## over the others (nlminb with TMB's exact gradient) at a fixed value, and the points where twice its rise
## equals qchisq(0.95, 1) found by uniroot (tolerance 1e-9). glmmTMB's confint interpolates a spline through a
## coarse profile, so its ends move by up to 1e-2 between its two routes above.
obj <- fit$obj
par_hat <- fit$fit$par
f_hat <- fit$fit$objective
se_hat <- sqrt(diag(vcov(fit, full = TRUE)))
profile_value <- function(j, t) {
  full <- function(p) { q <- par_hat; q[j] <- t; q[-j] <- p; q }
  opt <- nlminb(par_hat[-j], function(p) obj$fn(full(p)), function(p) obj$gr(full(p))[-j],
                control = list(rel.tol = 1e-14, x.tol = 1e-12))
  opt$objective
}
exact <- t(sapply(seq_along(par_hat), function(j) {
  excess <- function(t) 2 * (profile_value(j, t) - f_hat) - qchisq(0.95, 1)
  sapply(c(-1, 1), function(side) {
    uniroot(excess, sort(c(par_hat[j], par_hat[j] + side * 4 * se_hat[j])), tol = 1e-9)$root
  })
}))
p_re <- predict(fit, newdata = newdata, se.fit = TRUE, type = "link", re.form = NULL, allow.new.levels = TRUE)
p_fixed <- predict(fit, newdata = newdata, se.fit = TRUE, type = "link", re.form = NA)
out$cbpp <- list(
  formula = "cbind(incidence, size - incidence) ~ period + (1 | herd)",
  logLik = as.numeric(logLik(fit)),
  profile = list(label = rownames(prof), lower = unname(prof[, 1]), upper = unname(prof[, 2])),
  profile_internal = list(label = rownames(internal_prof), lower = unname(internal_prof[, 1]),
                          upper = unname(internal_prof[, 2])),
  profile_exact = list(name = names(par_hat), estimate = unname(par_hat), lower = unname(exact[, 1]),
                       upper = unname(exact[, 2])),
  wald = list(label = rownames(wald), lower = unname(wald[, 1]), upper = unname(wald[, 2])),
  predict = list(period = as.character(newdata$period), herd = as.character(newdata$herd),
                 link_with_random = unname(p_re$fit), se_with_random = unname(p_re$se.fit),
                 link_fixed_only = unname(p_fixed$fit), se_fixed_only = unname(p_fixed$se.fit)))
print(out$cbpp[c("profile", "profile_internal", "profile_exact", "wald")])

## sleepstudy (correlated): SDs and correlation with delta-method SEs from glmmTMB's own parameterisation
sleep <- read_set("sleepstudy", "sleepstudy.csv")
fit <- glmmTMB(Reaction ~ Days + (Days | Subject), data = sleep, REML = FALSE)
par <- fit$fit$par
V <- vcov(fit, full = TRUE)
stopifnot(length(par) == nrow(V))
it <- which(names(par) == "theta")
stopifnot(length(it) == 3)
ls1 <- par[it[1]]; ls2 <- par[it[2]]; cp <- par[it[3]]
sd1 <- exp(ls1); sd2 <- exp(ls2); rho <- cp / sqrt(1 + cp^2)
J <- matrix(0, 3, length(par))
J[1, it[1]] <- sd1
J[2, it[2]] <- sd2
J[3, it[3]] <- (1 + cp^2)^(-1.5)
se <- sqrt(diag(J %*% V %*% t(J)))
ibd <- which(names(par) == "betad")
sigma <- exp(par[ibd] / 2)  # glmmTMB 1.1.5: betad = 2 log(sigma)
se_sigma <- sigma / 2 * sqrt(V[ibd, ibd])
out$sleepstudy_varcorr <- list(
  formula = "Reaction ~ Days + (Days | Subject)", logLik = as.numeric(logLik(fit)),
  sd = unname(c(sd1, sd2)), sd_se = se[1:2], corr = unname(rho), corr_se = se[3],
  sigma = unname(sigma), sigma_se = unname(se_sigma))
print(out$sleepstudy_varcorr)

## the uncorrelated models that bambi formulas write
bambi_fit <- function(formula, family, data) {
  fit <- glmmTMB(formula, family = family, data = data, REML = FALSE)
  entry <- list(formula = paste(deparse(formula, width.cutoff = 500L), collapse = " "), logLik = as.numeric(logLik(fit)), df = attr(logLik(fit), "df"),
                nobs = nobs(fit), fixed = fixed_table(fit), sd = sds(fit),
                pdHess = fit$sdr$pdHess)
  if (family$family == "gaussian") entry$sigma <- sigma(fit)
  entry
}
pen <- read_set("penicillin", "penicillin.csv")
grouse <- read_set("grouseticks", "grouseticks.csv")
out$bambi <- list(
  sleepstudy = bambi_fit(Reaction ~ Days + diag(Days | Subject), gaussian(), sleep),
  cbpp = bambi_fit(cbind(incidence, size - incidence) ~ period + (1 | herd), binomial(), cbpp),
  penicillin = bambi_fit(diameter ~ 1 + (1 | plate) + (1 | sample), gaussian(), pen),
  grouseticks = bambi_fit(TICKS ~ YEAR + HEIGHT_scaled + (1 | BROOD) + (1 | INDEX) + (1 | LOCATION), poisson(),
                          grouse))
str(out$bambi)
writeLines(toJSON(out, digits = NA, auto_unbox = TRUE, pretty = TRUE), out_json)
cat("wrote", out_json, "\n")
